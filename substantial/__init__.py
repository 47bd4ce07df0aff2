"""Substantial: brokerless durable execution for Python."""

from substantial.conductor import Agent, Conductor, Run
from substantial.context import ChildHandle, Context, RetryPolicy
from substantial.errors import (
    BackendError,
    BackendUnavailable,
    ChildFailed,
    CorruptRecord,
    InvalidArgument,
    NonDeterminismError,
    PositionTaken,
    ProtocolMismatch,
    ReceiveTimeout,
    ResultTimeout,
    RunCancelled,
    RunConflict,
    RunNotFound,
    RunReverted,
    SerializationError,
    StepFailed,
    StepTimeout,
    SubstantialError,
    UnknownWorkflow,
    Unsupported,
    WorkflowFailed,
    WorkflowMisuse,
    WorkflowTimeout,
)
from substantial.queues import Queue
from substantial.retention import PruneReport, Retention
from substantial.schedules import Cron, Every
from substantial.workflow import Workflow, workflow

__version__ = "0.2.0.dev0"

__all__ = [
    "Agent",
    "BackendError",
    "BackendUnavailable",
    "ChildFailed",
    "ChildHandle",
    "Conductor",
    "Context",
    "CorruptRecord",
    "Cron",
    "Every",
    "InvalidArgument",
    "NonDeterminismError",
    "PositionTaken",
    "ProtocolMismatch",
    "PruneReport",
    "Queue",
    "ReceiveTimeout",
    "ResultTimeout",
    "Retention",
    "RetryPolicy",
    "Run",
    "RunCancelled",
    "RunConflict",
    "RunNotFound",
    "RunReverted",
    "SerializationError",
    "StepFailed",
    "StepTimeout",
    "SubstantialError",
    "UnknownWorkflow",
    "Unsupported",
    "Workflow",
    "WorkflowFailed",
    "WorkflowMisuse",
    "WorkflowTimeout",
    "workflow",
]
