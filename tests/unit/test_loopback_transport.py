"""The in-process transport (ranks as threads) keeps the transport contract, and its runner names failing ranks."""

from __future__ import annotations

import time

import pytest
import torch

from hybrid_ext.comm.transports.contract import HostRoutes, PeerError, Transport
from hybrid_ext.comm.transports.loopback import LoopbackGroup, LoopbackTransport, RankError, run_ranks


def test_an_endpoint_is_a_transport_with_its_rank_size_timeout_and_name():
    group = LoopbackGroup(3, timeout=2.5)
    endpoints = group.endpoints()
    assert [e.rank for e in endpoints] == [0, 1, 2]
    assert all(isinstance(e, Transport) and e.size == 3 and e.timeout == 2.5 for e in endpoints)
    assert endpoints[0].name == "loopback"
    assert not isinstance(endpoints[0], HostRoutes)  # one host unless labelled


def test_ranks_labelled_with_hosts_carry_them():
    endpoint = LoopbackGroup(4, hosts=(0, 0, 1, 1)).endpoint(2)
    assert endpoint.hosts == (0, 0, 1, 1)
    with pytest.raises(ValueError, match="hosts names 3 ranks' hosts for a group of 4"):
        LoopbackGroup(4, hosts=(0, 0, 1))


def _swap(transport: LoopbackTransport, elements: int) -> torch.Tensor:
    """Both ranks send and receive at once: a transport that sent before receiving would deadlock here."""
    peer = 1 - transport.rank
    send = torch.full((elements,), float(transport.rank))
    recv = torch.empty(elements)
    transport.exchange(send, peer, recv, peer)
    send.fill_(-1.0)  # the message was taken when sent
    return recv


def test_two_ranks_exchange_with_each_other_at_once_and_the_send_is_a_copy():
    results = run_ranks(_swap, 2, 1 << 20)
    assert torch.equal(results[0], torch.ones(1 << 20))
    assert torch.equal(results[1], torch.zeros(1 << 20))


def _in_order(transport: LoopbackTransport) -> list[float]:
    if transport.rank == 0:
        for value in range(20):
            transport.exchange(torch.tensor([float(value)]), 1, None, None)
        return []
    received = []
    for _ in range(20):
        recv = torch.empty(1)
        transport.exchange(None, None, recv, 0)
        received.append(recv.item())
    return received


def test_messages_between_a_pair_arrive_in_the_order_they_were_sent():
    assert run_ranks(_in_order, 2)[1] == [float(v) for v in range(20)]


def test_a_receive_nobody_answers_raises_peer_error_naming_the_peer_after_the_timeout():
    endpoint = LoopbackGroup(2, timeout=0.2).endpoint(0)
    began = time.monotonic()
    with pytest.raises(PeerError, match=r"rank 1 sent nothing to rank 0 within 0\.2 s"):
        endpoint.exchange(None, None, torch.empty(3), 1)
    assert 0.2 <= time.monotonic() - began < 5.0


def test_a_message_of_the_wrong_size_or_dtype_is_a_peer_error_not_a_silent_copy():
    group = LoopbackGroup(2, timeout=1.0)
    sender, receiver = group.endpoints()
    sender.exchange(torch.zeros(4), 1, None, None)
    with pytest.raises(PeerError, match=r"rank 0 sent 4 torch\.float32 elements to rank 1, which expected 3"):
        receiver.exchange(None, None, torch.empty(3), 0)
    sender.exchange(torch.zeros(3, dtype=torch.float64), 1, None, None)
    with pytest.raises(PeerError, match=r"expected 3 torch\.float32"):
        receiver.exchange(None, None, torch.empty(3), 0)


def test_a_peer_outside_the_group_or_itself_is_refused():
    endpoint = LoopbackGroup(2).endpoint(0)
    with pytest.raises(ValueError, match="send_to=2 is not another rank"):
        endpoint.exchange(torch.zeros(1), 2, None, None)
    with pytest.raises(ValueError, match="recv_from=0 is not another rank"):
        endpoint.exchange(None, None, torch.zeros(1), 0)


def _rank_one_fails(transport: LoopbackTransport) -> None:
    if transport.rank == 1:
        raise ValueError("rank one's own error")
    transport.exchange(None, None, torch.empty(1), 1)  # waits for rank 1, which has failed


def test_a_failing_rank_is_named_and_its_peers_stop_waiting_at_once():
    began = time.monotonic()
    with pytest.raises(RankError, match="rank 1 of 2: ValueError: rank one's own error") as caught:
        run_ranks(_rank_one_fails, 2, peer_timeout=30.0)
    assert time.monotonic() - began < 10.0  # not the 30 s peer timeout
    assert isinstance(caught.value.__cause__, ValueError)
    assert set(caught.value.errors) == {0, 1}
    assert isinstance(caught.value.errors[0], PeerError) and "rank 1 failed" in str(caught.value.errors[0])


def _hangs(transport: LoopbackTransport) -> None:
    if transport.rank == 0:
        time.sleep(1.0)


def test_ranks_still_running_at_the_timeout_are_named():
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 2 still running after 0.1 s"):
        run_ranks(_hangs, 2, timeout=0.1)


def test_results_come_back_in_rank_order_with_the_extra_arguments():
    assert run_ranks(lambda transport, offset: transport.rank + offset, 5, 10) == [10, 11, 12, 13, 14]
