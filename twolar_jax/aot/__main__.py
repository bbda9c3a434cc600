"""`python -m twolar_jax.aot ...`: see twolar_jax.aot.main."""
import sys

from twolar_jax.aot.main import console_main

sys.exit(console_main())
