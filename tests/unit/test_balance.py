"""Keep-alive connections spread over workers: the shared board, the close decision, the middleware."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path

import pytest

from ml.serving.balance import BalancingMiddleware, ConnectionBalancer, LoadBoard, worker_balancer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pair(tmp_path: Path, clock: Clock) -> tuple[ConnectionBalancer, ConnectionBalancer]:
    """Two workers of one server: each maps the board file on its own."""
    path = tmp_path / "workers" / "1.load"
    return (
        ConnectionBalancer(LoadBoard(path), 1, 2, window_seconds=1.0, pace_seconds=0.05, clock=clock),
        ConnectionBalancer(LoadBoard(path), 2, 2, window_seconds=1.0, pace_seconds=0.05, clock=clock),
    )


def test_a_worker_holding_every_connection_closes_them_until_the_split_is_even(tmp_path: Path) -> None:
    clock = Clock()
    first, second = pair(tmp_path, clock)
    connections = {("10.0.0.1", port): first for port in range(8)}  # all eight accepted by worker 1
    reconnects = 0
    for _ in range(200):  # each connection sends a request every 10 ms; a closed one reconnects to worker 2
        for client, worker in list(connections.items()):
            clock.now += 0.01 / len(connections)
            if worker.should_close(client):
                del connections[client]
                connections[("10.0.0.1", 1000 + reconnects)] = second
                reconnects += 1
    split = sorted(sum(w is worker for w in connections.values()) for worker in (first, second))
    assert split == [4, 4] and reconnects == 4  # closed exactly the excess, then left alone


def test_an_even_or_nearly_even_split_is_never_disturbed(tmp_path: Path) -> None:
    clock = Clock()
    first, second = pair(tmp_path, clock)
    clients = [(first, ("a", port)) for port in range(5)] + [(second, ("b", port)) for port in range(4)]
    second.board.publish(2, 4, clock.now)  # both already serving (a lone first worker would shed one)
    closes = 0
    for _ in range(300):
        for worker, client in clients:
            clock.now += 0.002
            closes += worker.should_close(client)
    assert closes == 0 and first.closed == second.closed == 0


def test_a_large_pool_is_left_alone_within_an_eighth(tmp_path: Path) -> None:
    clock = Clock()
    first, second = pair(tmp_path, clock)
    for held, other, closes in ((40, 36, False), (40, 34, True), (16, 14, True), (3, 1, True), (3, 2, False)):
        first._seen.clear()
        second.board.publish(2, other, clock.now)
        clock.now += 0.1  # past the pace of the last close
        decisions = [first.should_close(("c", port)) for port in range(held)]
        assert any(decisions) is closes, (held, other)


def test_closes_are_paced_and_a_silent_sibling_counts_as_idle(tmp_path: Path) -> None:
    clock = Clock()
    first, second = pair(tmp_path, clock)
    second.board.publish(2, 6, clock.now)  # worker 2 says it holds 6 connections...
    assert not any([first.should_close(("c", port)) for port in range(6)])  # ...so 6 here are not too many
    clock.now += 0.6
    assert not any([first.should_close(("c", port)) for port in range(6)])  # 0.6 s old news: still good
    clock.now += 0.6  # worker 2 has said nothing for longer than the window: idle (or gone)
    decisions = [first.should_close(("c", port)) for port in range(6)]
    assert decisions == [True, False, False, False, False, False]  # one close per pace interval
    clock.now += 0.06
    assert first.should_close(("c", 1))
    assert first.board.count(1, clock.now, 1.0) == 4  # what it published: six, less the two it let go


def test_connections_quiet_for_a_window_are_not_counted(tmp_path: Path) -> None:
    clock = Clock()
    first, _ = pair(tmp_path, clock)
    for port in range(6):
        first.board.publish(2, 5, clock.now)
        assert not first.should_close(("old", port))
    clock.now += 2.0
    first.board.publish(2, 1, clock.now)
    assert not first.should_close(("new", 1))  # the six old ones left the window: 1 against 1
    assert first.board.count(1, clock.now, 1.0) == 1


def _publish(path: str, worker: int, count: int) -> None:
    import time

    LoadBoard(Path(path)).publish(worker, count, time.monotonic())


def test_the_board_is_shared_between_processes(tmp_path: Path) -> None:
    import time

    path = tmp_path / "workers" / "9.load"
    board = LoadBoard(path)
    process = multiprocessing.get_context("spawn").Process(target=_publish, args=(str(path), 2, 7))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert board.count(2, time.monotonic(), 30.0) == 7 and board.count(1, time.monotonic(), 30.0) == 0


def test_boards_of_gone_servers_are_removed_and_one_worker_needs_none(tmp_path: Path) -> None:
    folder = tmp_path / "workers"
    folder.mkdir()
    dead = multiprocessing.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join(60)
    (folder / f"{dead.pid}.load").write_bytes(b"")
    (folder / f"{os.getpid()}.load").write_bytes(b"")  # a live server's board stays
    balancer = worker_balancer(tmp_path, 1, 2)
    assert balancer is not None and balancer.board.path == folder / f"{os.getppid()}.load"
    assert not (folder / f"{dead.pid}.load").exists() and (folder / f"{os.getpid()}.load").exists()
    assert worker_balancer(tmp_path, 1, 1) is None and worker_balancer(tmp_path, 0, 2) is None
    with pytest.raises(ValueError):
        ConnectionBalancer(balancer.board, 65, 2)


def test_the_middleware_closes_the_chosen_connection_and_answers_it_in_full(tmp_path: Path) -> None:
    clock = Clock()
    first, _ = pair(tmp_path, clock)

    async def app(scope, receive, send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"connection", b"keep-alive")]}
        )
        await send({"type": "http.response.body", "body": b"answer"})

    async def request(client: tuple[str, int], method: str = "POST") -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": method, "path": "/predict", "client": client, "headers": []}
        await BalancingMiddleware(app, first)(scope, receive, send)
        return sent

    async def scenario() -> list[list[dict]]:
        return [await request(("c", port)) for port in range(3)] + [await request(("c", 9), "GET")]

    answers = asyncio.run(scenario())
    headers = [dict(sent[0]["headers"]) for sent in answers]
    # worker 2 has published nothing: idle; the second connection here is one too many, the third is paced
    assert [h[b"connection"] for h in headers] == [b"keep-alive", b"close", b"keep-alive", b"keep-alive"]
    assert all(sent[1]["body"] == b"answer" for sent in answers)  # closing never withholds an answer
    assert headers[1] == {b"connection": b"close"}  # the app's own connection header replaced
    assert first.closed == 1  # the GET was not counted
