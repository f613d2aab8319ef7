"""`python -m dtrain.tune CONFIG [key=value ...]`: a Ray Tune search (dtrain/ray/tune.py).

This entry point imports Ray only when run, so that the core (everything but dtrain/ray/) never does."""

if __name__ == "__main__":
    import sys

    # Run through the importable module, so that Ray ships the trial function by reference.
    from dtrain.ray.tune import main

    sys.exit(main())
