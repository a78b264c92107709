"""`python -m priors.fit checkpoint=PATH prior=<option>`: fit a prior to a trained VAE (see surgery/fit.py)."""

from surgery.fit import main

if __name__ == "__main__":
    main()
