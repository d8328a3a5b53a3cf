"""LeNet's FLOPs per training step counted by hand, for the bench tests (a helper module beside them, as
tests/data/datafiles.py: a second conftest.py would make `from conftest import ...` ambiguous)."""


def lenet_training_flops(batch: int, side: int, classes: int = 10) -> int:
    """FLOPs of one LeNet training step (forward + backward; the input needs no gradient), by hand: a conv or
    linear layer costs 2*MACs forward, twice that backward (input and weight gradients), conv1 only its weights'."""
    s1 = side - 4  # conv1 5x5 output side
    s2 = s1 // 2 - 4  # conv2 output side
    conv1 = 2 * 20 * s1 * s1 * 1 * 25
    conv2 = 2 * 50 * s2 * s2 * 20 * 25
    fc1 = 2 * (50 * (s2 // 2) ** 2) * 500
    fc2 = 2 * 500 * classes
    return batch * (2 * conv1 + 3 * (conv2 + fc1 + fc2))
