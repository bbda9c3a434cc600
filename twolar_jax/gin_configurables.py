"""The classes and functions gin files may name, registered once (imported by the entry points)."""
import gin

from twolar_jax.model.config import T5Config, preset

T5Config = gin.external_configurable(T5Config, name="T5Config")
model_preset = gin.external_configurable(preset, name="model_preset")
