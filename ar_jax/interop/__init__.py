"""Other tools' formats: Hugging Face checkpoints in and out, lm-evaluation-harness."""
