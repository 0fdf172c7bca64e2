"""The comparison harness: tpmbroker beside the other ways of getting a TPM signature.

Not part of the tpmbroker package: it needs tpm2-openssl, tpm2-abrmd and a C compiler
at run time, and uses only tpmbroker's public surface. Run it from the checkout's root:

    python -m benchmarks --out bench-results

docs/benchmarks.md describes the systems, the options and the figures.
"""
