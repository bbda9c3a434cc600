"""`python -m data_pipeline.set_builder`: the build's command line (data_pipeline/set_builder/cli.py)."""
import sys

from data_pipeline.set_builder.cli import console_main

sys.exit(console_main())
