"""Uses of the library: experiments (sequences of requests) and benchmarks."""
