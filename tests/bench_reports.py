"""Reading the benchmark scripts' JSON in tests."""

from __future__ import annotations

from typing import Any


def errors_in(report: Any, path: str = "") -> list[str]:
    """Every `error` a report recorded, with where: a figure that failed is recorded, not raised."""
    if isinstance(report, dict):
        found = [f"{path}: {report['error']}"] if "error" in report else []
        return found + [e for key, value in report.items() for e in errors_in(value, f"{path}/{key}")]
    if isinstance(report, list):
        return [e for i, value in enumerate(report) for e in errors_in(value, f"{path}/{i}")]
    return []
