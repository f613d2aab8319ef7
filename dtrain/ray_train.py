"""`python -m dtrain.ray_train CONFIG [key=value ...]`: a run on Ray Train (dtrain/ray/train.py).

This entry point imports Ray only when run, so that the core (everything but dtrain/ray/) never does."""

if __name__ == "__main__":
    import sys

    # Run through the importable module, so that Ray ships its worker function by reference
    # (the workers import dtrain.ray.train) rather than pickling __main__ by value.
    from dtrain.ray.train import main

    sys.exit(main())
