"""Loss replay: compare a candidate detection loss with a reference dump's, stage by stage and end to end.

Three passes per loss case in the dump (`manifest.loss.cases`):

1. stage cross-replay (section `loss/{case}`): every stage the candidate exposes is fed the REFERENCE's inputs
   for that stage and its outputs are compared with the reference's. A wrong stage shows up on its own row,
   however wrong the stages before it are; every stage after the assignment runs on the reference
   assignment, so a tie-break flip in the assigner cannot turn later numbers red.
2. end to end (section `loss/{case} end-to-end`): the reference head outputs and ground truth go through the
   whole candidate loss; each term (box, cls, dfl) gets its own verdict, under the batch-size convention the
   candidate declares (stated on the row), plus every intermediate the candidate returns.
3. gradients (section `loss/{case} gradients`): per term, the gradient w.r.t. the head outputs, end to end
   and (when the candidate exposes the stages) conditioned on the reference assignment.

Discrete outputs are judged as discrete: foreground anchors and their ground-truth index per image and per
box (positives on both sides, anchors added and removed), each flip classified as a near-tie (its alignment
metric within tolerance of the top-k boundary, or equal overlaps in a conflict: a harmless tie-break) or real.

A candidate loss is a `LossAdapter` (docs/loss-adapter.md): `builtin` (the clean-room loss, optionally with an
injected bug), `package.module:factory`, or an adapter object; or a candidate DUMP, whose recorded stages are
checked against ultralytics' arithmetic on the candidate's own inputs. The replay returns evidence;
`parity.diagnose.loss` turns it into findings (its `compare_loss` runs both).

    spec        what the reference dump says the loss is (LossSpec), the stage vocabulary, one case's tensors
    adapter     LossAdapter: a user's loss callable, its prediction and target layouts and conventions
    returns     reading a candidate loss's return value by types and shapes
    loading     a candidate loss from `builtin`, `package.module:factory`, an adapter or a callable
    cases       replaying one case (stages, the whole loss, gradients) against the reference
    recorded    judging a candidate dump's recorded loss tensors
    assignment  the assignment as discrete data (flips, near-ties)
    evidence    what the replay saw (StageEvidence, CaseEvidence, LossEvidence, BroadcastWatch)
    run         every chosen case, the coverage and the stage table
"""

from parity.replay.loss.spec import (ASSIGNER_INPUT_NAMES, CATEGORY, REFERENCE_STAGE, REPLAY_STAGES, STAGE_OUTPUTS,
                                     TERMS, CaseView, LossSpec)
from parity.replay.loss.returns import RETURN_SHAPES, CandidateResult, read_loss_return
from parity.replay.loss.adapter import LABEL_LAYOUTS, LEVEL_ORDERS, LossAdapter
from parity.replay.loss.loading import builtin_loss_adapter, load_loss_candidate
from parity.replay.loss.evidence import BroadcastEvent, BroadcastWatch, CaseEvidence, LossEvidence, StageEvidence
from parity.replay.loss.assignment import AssignmentDiff, Flip, compare_assignment
from parity.replay.loss.cases import CaseReplay, candidate_exception
from parity.replay.loss.recorded import RecordedCaseReplay, RecordedLoss
from parity.replay.loss.run import LossReplay, first_wrong_stage, mark_drifted_stages, stage_table_key

__all__ = [
    "ASSIGNER_INPUT_NAMES", "CATEGORY", "REFERENCE_STAGE", "REPLAY_STAGES", "STAGE_OUTPUTS", "TERMS", "CaseView",
    "LossSpec", "RETURN_SHAPES", "CandidateResult", "read_loss_return", "LABEL_LAYOUTS", "LEVEL_ORDERS",
    "LossAdapter", "builtin_loss_adapter", "load_loss_candidate", "BroadcastEvent", "BroadcastWatch",
    "CaseEvidence", "LossEvidence", "StageEvidence", "AssignmentDiff", "Flip", "compare_assignment", "CaseReplay",
    "candidate_exception", "RecordedCaseReplay", "RecordedLoss", "LossReplay", "first_wrong_stage",
    "mark_drifted_stages", "stage_table_key",
]
