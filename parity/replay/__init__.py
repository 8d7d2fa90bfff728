"""Replays: feed a candidate the reference's own tensors and compare what comes out (layers here, loss in
`parity.replay.loss`)."""
