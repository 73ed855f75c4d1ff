"""Which chunked prefills in flight a transformation parks (gyges.switch.chunked), and where
a split sends a parked one (gyges.switch.member._waiting_halves). The park itself runs
SGLang's own release path and is tested on live servers (tests/server/test_chunked_prefill)."""
from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from gyges.switch.chunked import Parked, resume_cap, why_not_parkable
from gyges.switch.member import _waiting_halves


def _tree(disable: bool = False, mamba: bool = False) -> NS:
    return NS(disable=disable, insert=lambda *a: None, root_node=NS(children={}),
              supports_mamba=lambda: mamba)


def _sched(req=None, tree=None, pending_abort=None) -> NS:
    return NS(chunked_req=req, tree_cache=tree if tree is not None else _tree(),
              _pending_chunked_abort_req=pending_abort)


def _req(**kw) -> NS:
    return NS(rid="doc", return_logprob=False, logprob_start_len=-1,
              skip_radix_cache_insert=False, kv=NS(kv_committed_len=640), **kw)


def test_no_chunked_prefill_is_nothing_to_park():
    assert why_not_parkable(_sched()) is None


def test_a_plain_chunked_prefill_parks():
    assert why_not_parkable(_sched(_req())) is None


def test_what_holds_the_transformation_instead():
    req = _req()
    assert "prefix cache is off" in why_not_parkable(_sched(req, _tree(disable=True)))
    assert "mamba" in why_not_parkable(_sched(req, _tree(mamba=True)))
    assert "being aborted" in why_not_parkable(_sched(req, pending_abort=req))
    barred = _req()
    barred.skip_radix_cache_insert = True
    assert "barred" in why_not_parkable(_sched(barred))


def test_every_logprob_request_parks_and_resumes_where_its_logprobs_start():
    # SGLang sets logprob_start_len to the prompt length for output logprobs (its default)
    # and -1 for the last position only; input logprobs from 100 resume at 100 (SGLang
    # caps the prefix match there and computes them again)
    for start, cap in ((-1, 2400), (100, 100), (640, 640), (2400, 2400)):
        req = _req(origin_input_ids=list(range(2400)))
        req.return_logprob, req.logprob_start_len = True, start
        assert why_not_parkable(_sched(req)) is None, start
        assert resume_cap(req) == cap, start
    assert resume_cap(_req(origin_input_ids=list(range(2400)))) == 2400


def test_split_sends_waiting_requests_alternately():
    assert _waiting_halves(list("abcde"), None, 100) == [0, 1, 0, 1, 0]


def test_split_sends_a_parked_prefill_where_its_prefix_is():
    waiting = ["a", "doc", "b"]
    # 2 halves of 100 merged slots each: most of the prefix in the second half
    parked = Parked("doc", torch.tensor([5, 150, 160, 170], dtype=torch.int64))
    assert _waiting_halves(waiting, parked, 100) == [0, 1, 0]
    parked = Parked("doc", torch.tensor([5, 6, 7, 170], dtype=torch.int64))
    assert _waiting_halves(waiting, parked, 100) == [0, 0, 0]
    # nothing published (a page not yet full): alternation
    assert _waiting_halves(waiting, Parked("doc", torch.empty(0, dtype=torch.int64)),
                           100) == [0, 1, 0]


def test_parking_can_be_turned_off_in_a_running_server(tmp_path, monkeypatch):
    knob = tmp_path / "park"
    monkeypatch.setenv("GYGES_PARK_CHUNKED_PREFILL", f"@{knob}")
    assert why_not_parkable(_sched(_req())) is None  # no file: on
    knob.write_text("0\n")
    assert "parking is off" in why_not_parkable(_sched(_req()))
    knob.write_text("1")
    assert why_not_parkable(_sched(_req())) is None
