"""Ray, outside the core: the only dtrain modules that import it.

    train.py   a run as a Ray Train TorchTrainer, one worker per rank (`python -m dtrain.ray_train`)
    tune.py    Ray Tune searches whose trials are ordinary runs (`python -m dtrain.tune`)

Both call the core's `dtrain.train.train(cfg, report=...)`; the core never imports Ray (a test checks).
"""
