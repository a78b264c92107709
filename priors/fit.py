"""`python -m priors.fit checkpoint=PATH prior=<option>`: fit a prior to a trained VAE (see surgery/fit.py).

The work lives in `surgery.fit`, which sits above the priors, the VAE and the surgery;
this module is its command-line entry point under the name users look for.
"""

from surgery.fit import main

if __name__ == "__main__":
    main()
