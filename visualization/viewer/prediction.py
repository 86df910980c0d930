"""What a checkpoint's network says about one image of its dataset."""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.models import Checkpoint, Dataset
from visualization.viewer.cache import ProcessCache
from visualization.viewer.images import ImageRecord, training_sample

if TYPE_CHECKING:
    import torch
    from torch import nn

# Networks are small, but reading and verifying weights costs more than a forward pass:
# keep the last few checkpoints a user clicked through.
_networks: ProcessCache[tuple[int, str, str], nn.Module] = ProcessCache(maxsize=4)


class CheckpointUnusable(Exception):
    """The checkpoint's weights cannot be read, or its network cannot take this image."""


def network_of(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's network in evaluation mode, built once per process."""
    # The engine (PyTorch) is imported by the first prediction a web process makes.
    from training.federation import network_with_weights
    from training.fl.weights import WeightsError
    from training.modelstore import load_stored_weights

    def build() -> nn.Module:
        try:
            weights = load_stored_weights(checkpoint.file.name, checkpoint.sha256)
            network = network_with_weights(checkpoint.experiment, weights)
        except (WeightsError, OSError, RuntimeError, ValueError) as error:
            raise CheckpointUnusable(
                f"The weights of checkpoint {checkpoint.pk} cannot be loaded: {error}"
            ) from None
        return network.eval()

    return _networks.get_or_compute((checkpoint.pk, checkpoint.file.name, checkpoint.sha256), build)


def class_probabilities(network: nn.Module, tensor: torch.Tensor) -> list[float]:
    """Softmax over the network's logits for one channels-first image tensor."""
    import torch

    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.inference_mode():
        logits = network(tensor.unsqueeze(0).to(device))
    return torch.softmax(logits.float(), dim=1)[0].cpu().tolist()


def predict(checkpoint: Checkpoint, dataset: Dataset, record: ImageRecord) -> dict:
    """Predicted class and per-class probabilities for the image, with its true label.

    The image goes through the same preprocessing as in training (the cached training
    dataset gives the tensor), so the answer is what the federation's model would say.
    """
    network = network_of(checkpoint)
    tensor, true_label = training_sample(dataset, record)
    try:
        probabilities = class_probabilities(network, tensor)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointUnusable(
            f"The network of checkpoint {checkpoint.pk} cannot take this image "
            f"(a tensor of shape {list(tensor.shape)}): {reason}"
        ) from None
    predicted = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {"probabilities": probabilities, "predicted_label": predicted, "true_label": true_label}
