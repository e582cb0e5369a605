import os

from hypothesis import HealthCheck, settings

# The fast backend's tests must run its kernels: on an empty cache the first forward would otherwise run the
# reference's while they compile in the background (vitnp.compiling.Tiering); tests/test_kernel_cache.py tests that.
os.environ.setdefault("VITNP_COMPILE", "wait")

# Numba compiles each kernel on first use (seconds), so Hypothesis deadlines would fire on the first example.
settings.register_profile(
    "vitnp",
    deadline=None,
    max_examples=int(os.environ.get("VITNP_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("vitnp")
