"""ember's own compute kernels: C for the CPU (built on first use with the machine's compiler)."""
