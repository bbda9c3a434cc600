"""The teacher's pure parts: RankGPT prompt, permutation parsing and repair, sliding windows."""
import pytest

from data_pipeline.set_builder.teacher import (POST_PROMPT, PROMPT_VERSION, Repairs, build_messages, parse_permutation,
                                   window_spans)


def test_teacher_prompt_is_rankgpt_layout():
    msgs = build_messages("what is a cat", ["Cats are animals.", "word " * 500], max_words=300)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant",
                                         "user"]
    assert msgs[0]["content"].startswith("You are RankGPT")
    assert msgs[1]["content"] == ("I will provide you with 2 passages, each indicated by number identifier []. \n"
                                  "Rank the passages based on their relevance to query: what is a cat.")
    assert msgs[3]["content"] == "[1] Cats are animals."
    assert msgs[4]["content"] == "Received passage [1]."
    assert len(msgs[5]["content"].split()) == 1 + 300  # "[2]" + 300 words: cut to max_words
    assert msgs[-1]["content"] == POST_PROMPT.format(num=2, query="what is a cat")
    assert "[] > []" in msgs[-1]["content"] and PROMPT_VERSION == "rankgpt-v1"


@pytest.mark.parametrize("text, n, order, repairs", [
    ("[3] > [1] > [2]", 3, [2, 0, 1], Repairs()),
    ("[2] > [2] > [1] > [3]", 3, [1, 0, 2], Repairs(duplicates=1)),
    ("[2] > [7] > [0] > [1] > [3]", 3, [1, 0, 2], Repairs(out_of_range=2)),
    ("[3]", 4, [2, 0, 1, 3], Repairs(missing=3)),
    ("I cannot rank these.", 3, [0, 1, 2], Repairs(missing=3, unparseable=1)),
    ("3 > 1 > 2", 3, [2, 0, 1], Repairs()),  # bare numbers when there are no brackets (RankGPT)
    ("Ranking: [ 2 ] > [1] (passage 3 is off topic)", 3, [1, 0, 2], Repairs(missing=1)),  # brackets win over bare
    ("", 0, [], Repairs()),
])
def test_teacher_parse_permutation_repairs(text, n, order, repairs):
    got, rep = parse_permutation(text, n)
    assert got == order
    assert rep == repairs
    assert sorted(got) == list(range(n))


def test_teacher_window_spans_bottom_to_top():
    assert window_spans(30, 20, 10) == [(10, 30), (0, 20)]
    assert window_spans(20, 20, 10) == [(0, 20)]
    assert window_spans(5, 20, 10) == [(0, 5)]
    assert window_spans(25, 20, 10) == [(5, 25), (0, 15)]  # the top always gets a window
    assert window_spans(100, 20, 10)[0] == (80, 100) and window_spans(100, 20, 10)[-1] == (0, 20)
    assert len(window_spans(100, 20, 10)) == 9
    assert window_spans(0, 20, 10) == []
    with pytest.raises(ValueError):
        window_spans(10, 0, 1)


def test_teacher_single_passage_needs_no_call(tmp_path):
    from data_pipeline.set_builder.llm_client import ChatClient
    from data_pipeline.set_builder.teacher import ListwiseLLMTeacher, TeacherRequest

    # Port 9 (discard) on loopback: any call would fail, so a result proves no call was made.
    client = ChatClient(model="m", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout_s=1.0)
    teacher = ListwiseLLMTeacher(client=client, progress=False)
    got = []
    run = teacher.rank_all([TeacherRequest("q", "query", ("only passage",))], got.append, work_dir=tmp_path)
    assert run.labelled == 1 and got[0].order == [0] and client.stats.attempts == 0
    teacher.close()
