"""dtrain: fine-tune and train large language models from one YAML file, from one CPU to many GPUs."""

__version__ = "0.1.0"
