"""vitnp: the Vision Transformer family, forward pass, in NumPy and Numba, equal to PyTorch."""

from .memory import collector_paused, keep_freed_memory

with collector_paused():  # the imports' objects are all kept: collecting meanwhile would free nothing
    from .compiling import announce_compiling
    from .kernel_cache import install_kernel_locators

    install_kernel_locators()  # before any kernel is defined (stamped by the kernel sources; where nothing is writable)

    from .layouts import LayoutError
    from .model import WeightsError, count_params
    from .preprocess import load_image, normalize, preprocess
    from .registry import create_model, data_config, list_models
    from .threads import get_num_threads, set_num_threads
    from .weights import WeightsFileError, load_weights

__version__ = "0.1.0"

__all__ = [
    "LayoutError",
    "WeightsError",
    "WeightsFileError",
    "announce_compiling",
    "count_params",
    "create_model",
    "data_config",
    "get_num_threads",
    "keep_freed_memory",
    "list_models",
    "load_image",
    "load_weights",
    "normalize",
    "preprocess",
    "set_num_threads",
]
