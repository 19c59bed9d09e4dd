"""Models: importing this package fills the registry."""

from cifarbench.models import notebook, resnet, speedrun  # noqa: F401  (each registers its models)
from cifarbench.models.registry import (
                                        build_model,
                                        count_parameters,
                                        create_model,
                                        get_model_spec,
                                        is_fully_connected,
                                        list_models,
                                        register_model,
)

__all__ = ["build_model", "count_parameters", "create_model", "get_model_spec", "is_fully_connected", "list_models",
           "register_model"]
