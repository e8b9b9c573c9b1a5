"""The trainers of the use cases (the `Trainer` port in pipelines/model/trainer.py), registered
in pipelines/plugins.py under the concern `trainer`. Each `<use case>_model.py` beside a trainer
is the served model's code, saved into every artifact: it imports nothing from CDL."""
