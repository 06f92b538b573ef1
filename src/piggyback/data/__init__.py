"""Task data: built-in offline benchmarks, image folders, CSV lists, torchvision and HF sets.

Every item is ``(image, label)``: a float32 ``[3, size, size]`` tensor normalised with the
backbone's `InputSpec`, and an int. Images stay uint8 at their own size until an item is
asked for; resizing one 28x28 image then costs about 45 µs, as much as normalising it, so
nothing is cached at the target size and memory does not grow with it.

`builtin` holds the offline benchmarks, `sources` opens folders, CSV lists, torchvision
and Hugging Face sets, and `tasks` splits them into datasets and makes their loaders.
Integer labels (a CSV's, or those of a dataset without class names) are class indices
below `MAX_CLASSES`, so a stray label cannot ask for a head of millions of classes.

Example:
    >>> from piggyback.backbones import InputSpec
    >>> spec = InputSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> task = load_task_data("digits", spec, limit=40)
    >>> task.num_classes, len(task.train), tuple(task.train[0][0].shape)
    (10, 40, (3, 32, 32))
"""

from .builtin import (
    ANIMAL_CLASSES,
    BUILTIN_TASKS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
)
from .builtin import _read_pickled_array as _read_pickled_array
from .sources import IMAGE_EXTENSIONS, MAX_CLASSES
from .tasks import TaskData, TaskDataset, image_transform, load_task_data, make_loader

__all__ = [
    "ANIMAL_CLASSES",
    "BUILTIN_TASKS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "MAX_CLASSES",
    "TaskData",
    "TaskDataset",
    "image_transform",
    "load_task_data",
    "make_loader",
]
