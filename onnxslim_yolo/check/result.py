"""Check results and the report that collects them (JSON-able, one line per verdict)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"
STATUSES = (PASS, FAIL, WARN, SKIP)
#: items kept in a details list (the count is always reported in full)
DETAIL_LIMIT = 20


@dataclass
class CheckResult:
    """One check's verdict: ``status`` is pass/fail/warn/skip, ``message`` one line."""

    name: str
    status: str
    message: str
    details: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: unknown status '{self.status}'")
        self.message = " ".join(str(self.message).split())

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "status": self.status, "message": self.message, "details": self.details}


def passed(name: str, message: str, **details: Any) -> CheckResult:
    return CheckResult(name, PASS, message, details)


def failed(name: str, message: str, **details: Any) -> CheckResult:
    return CheckResult(name, FAIL, message, details)


def warned(name: str, message: str, **details: Any) -> CheckResult:
    return CheckResult(name, WARN, message, details)


def skipped(name: str, message: str, **details: Any) -> CheckResult:
    return CheckResult(name, SKIP, message, details)


def listing(items: Iterable[Any], limit: int = DETAIL_LIMIT) -> List[Any]:
    """The first ``limit`` items (details stay small on big models)."""
    out: List[Any] = []
    for i, it in enumerate(items):
        if i >= limit:
            break
        out.append(it)
    return out


def summarize(items: Sequence[str], limit: int = 3) -> str:
    """``a, b, c (+4 more)`` for one-line messages."""
    head = ", ".join(str(i) for i in items[:limit])
    return head + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


@dataclass
class CheckReport:
    """All check results for one model; ``ok`` is False when any check failed."""

    results: List[CheckResult]
    model: Optional[str] = None
    reference: Optional[str] = None
    target: str = "ort-cpu"
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> List[CheckResult]:
        return [r for r in self.results if r.status == FAIL]

    @property
    def warnings(self) -> List[CheckResult]:
        return [r for r in self.results if r.status == WARN]

    def get(self, name: str) -> Optional[CheckResult]:
        return next((r for r in self.results if r.name == name), None)

    def counts(self) -> Dict[str, int]:
        return {s: sum(1 for r in self.results if r.status == s) for s in STATUSES}

    def verdict(self) -> str:
        c = self.counts()
        if c[FAIL]:
            return f"FAIL: {c[FAIL]} check(s) failed, {c[WARN]} warning(s)"
        return f"PASS: {c[PASS]} passed, {c[WARN]} warning(s), {c[SKIP]} skipped"

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "verdict": self.verdict(), "model": self.model, "reference": self.reference,
                "target": self.target, "counts": self.counts(), "settings": dict(self.settings),
                "checks": [r.to_dict() for r in self.results]}
