"""Experiment tracking: the ``GeneralTracker`` interface, the built-in backends, and ``log_with`` handling.

Same names and constructor arguments as ``accelerate.tracking``. Each backend's
package is imported only when its tracker starts; asking for one that is not
installed raises an ``ImportError`` with the pip command.
"""

from hasten._tracking.aim import AimTracker
from hasten._tracking.base import GeneralTracker, on_main_process
from hasten._tracking.clearml import ClearMLTracker
from hasten._tracking.comet import CometMLTracker
from hasten._tracking.dvclive import DVCLiveTracker
from hasten._tracking.mlflow import MLflowTracker
from hasten._tracking.registry import (
    LOGGER_TYPE_TO_CLASS,
    filter_trackers,
    get_available_trackers,
    register_tracker_class,
)
from hasten._tracking.runs import SwanLabTracker, TrackioTracker, WandBTracker
from hasten._tracking.tensorboard import TensorBoardTracker
from hasten.utils.dataclasses.enums import LoggerType

__all__ = [
    "LOGGER_TYPE_TO_CLASS",
    "AimTracker",
    "ClearMLTracker",
    "CometMLTracker",
    "DVCLiveTracker",
    "GeneralTracker",
    "LoggerType",
    "MLflowTracker",
    "SwanLabTracker",
    "TensorBoardTracker",
    "TrackioTracker",
    "WandBTracker",
    "filter_trackers",
    "get_available_trackers",
    "on_main_process",
    "register_tracker_class",
]
