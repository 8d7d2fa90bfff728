"""The result of a comparison, independent of how it is shown (terminal table or JSON).

Every comparison (layers, loss, dump-vs-dump) produces one `Report`. `parity.report.text` turns it into a rich
table or the versioned JSON document described in docs/report-format.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_SCHEMA = "yolo-parity-report"
REPORT_SCHEMA_VERSION = 1

# Whether dumps check each tensor against its manifest checksum as it is read. On unless the person opted out
# (`--no-verify`); a process-wide choice, because every reader of a command (replay, compare, candidates) opens
# the dumps itself. It lives here, in the base room, because every Report states it; `parity.dump.files` reads
# it for each Dump it opens.
_READ_VERIFICATION = {"enabled": True}


def read_verification() -> bool:
    return _READ_VERIFICATION["enabled"]


@contextmanager
def verify_reads(enabled: bool) -> Iterator[None]:
    """Dumps opened inside the block check (or, with False, do not check) every tensor they read."""
    before = _READ_VERIFICATION["enabled"]
    _READ_VERIFICATION["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _READ_VERIFICATION["enabled"] = before


@dataclass
class Finding:
    """A diagnosis: what is wrong, where, and the evidence, in one sentence."""

    signature: str  # stable id, e.g. "bias-init-float32", "missing-sigmoid"
    where: str  # e.g. "layer 23, cls bias init, stride 8" or "loss stage assign"
    message: str
    severity: str = "error"  # "error" fails the comparison, "warning" and "info" do not
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One compared tensor (or one structural check)."""

    section: str  # e.g. "structure", "isolated", "chained", "loss/default", "gradients"
    where: str  # layer index or loss stage, as shown to the person
    name: str  # the dump name of the tensor, or the check's name
    passed: bool
    metrics: dict[str, Any] | None = None  # TensorMetrics.as_dict(), when numbers were compared
    tolerance: dict[str, Any] | None = None
    note: str = ""


@dataclass
class Report:
    command: str  # "compare --what layers", …
    reference: str
    candidate: str
    profile: str  # tolerance profile used
    rows: list[Row] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    coverage: dict[str, Any] = field(default_factory=dict)  # what the candidate covered and left out
    context: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not read_verification():  # `--no-verify`: say that nothing read was checked against its checksum
            self.context["checksums"] = "not verified (--no-verify): tensors were read without checking them " \
                                        "against their manifest checksums"
            self.coverage.setdefault("not_checked", []).append(
                "checksums: tensors were read without checking them against their manifest checksums (--no-verify)")

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def find(self, finding: Finding) -> Finding:
        if not any(f.signature == finding.signature and f.where == finding.where for f in self.findings):
            self.findings.append(finding)
        return finding

    @property
    def failed_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def verdict(self) -> str:
        return "divergence" if self.failed_rows or self.errors else "parity"

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "parity" else 1

    def first_divergence(self, section: str | None = None) -> Row | None:
        for row in self.rows:
            if not row.passed and (section is None or row.section == section):
                return row
        return None

    def merge(self, other: "Report") -> "Report":
        self.rows.extend(other.rows)
        for finding in other.findings:
            self.find(finding)
        self.coverage.update(other.coverage)
        self.context.update(other.context)
        return self

    def to_dict(self) -> dict:
        first = self.first_divergence()
        return {
            "schema": REPORT_SCHEMA,
            "schema_version": REPORT_SCHEMA_VERSION,
            "command": self.command,
            "reference": self.reference,
            "candidate": self.candidate,
            "profile": self.profile,
            "verdict": self.verdict,
            "first_divergence": asdict(first) if first else None,
            "findings": [asdict(f) for f in self.findings],
            "rows": [asdict(r) for r in self.rows],
            "coverage": self.coverage,
            "context": self.context,
        }
