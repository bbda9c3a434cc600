"""Build the distillation set: query sources, first-stage candidates, the (LLM) teacher's order, durable
resumable outputs and a manifest. No TensorFlow here."""
