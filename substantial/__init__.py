"""Substantial: brokerless durable execution for Python."""

from substantial.conductor import Agent, Conductor, Run
from substantial.context import Context, RetryPolicy
from substantial.errors import (
    BackendError,
    BackendUnavailable,
    CorruptRecord,
    InvalidArgument,
    NonDeterminismError,
    PositionTaken,
    ProtocolMismatch,
    ReceiveTimeout,
    ResultTimeout,
    RunCancelled,
    RunNotFound,
    RunReverted,
    SerializationError,
    StepFailed,
    StepTimeout,
    SubstantialError,
    UnknownWorkflow,
    WorkflowFailed,
)
from substantial.workflow import Workflow, workflow

__version__ = "0.2.0.dev0"

__all__ = [
    "Agent",
    "BackendError",
    "BackendUnavailable",
    "Conductor",
    "Context",
    "CorruptRecord",
    "InvalidArgument",
    "NonDeterminismError",
    "PositionTaken",
    "ProtocolMismatch",
    "ReceiveTimeout",
    "ResultTimeout",
    "RetryPolicy",
    "Run",
    "RunCancelled",
    "RunNotFound",
    "RunReverted",
    "SerializationError",
    "StepFailed",
    "StepTimeout",
    "SubstantialError",
    "UnknownWorkflow",
    "Workflow",
    "WorkflowFailed",
    "workflow",
]
