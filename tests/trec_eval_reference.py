"""trec_eval's own numbers for the metric tests: ir-measures' pytrec_eval provider on raw scores."""
from __future__ import annotations


def pytrec_eval_per_query(qrels, run, measures) -> dict:
    """Per-query values (0.0 for a judged query absent from the run), as trec_eval -c computes them."""
    import ir_measures

    parsed = [ir_measures.parse_measure(m) for m in measures]
    out = {q: {m: 0.0 for m in measures} for q in qrels}
    for metric in ir_measures.pytrec_eval.iter_calc(parsed, qrels, {q: d for q, d in run.items() if q in qrels}):
        out[metric.query_id][str(metric.measure)] = metric.value
    return out
