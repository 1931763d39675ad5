"""Keep-alive connections spread over workers: the shared board, the close decision, the middleware."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from ml.serving.balance import (
    BalancedConnections,
    ConnectionBalancer,
    LoadBoard,
    keep_alive_client,
    worker_balancer,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def balancer(tmp_path: Path, clock: Clock, worker: int, workers: int = 2) -> ConnectionBalancer:
    """One worker of a server: each maps the board file on its own."""
    board = LoadBoard(tmp_path / "boards" / "1.load")
    return ConnectionBalancer(board, worker, workers, window_seconds=1.0, pace_seconds=0.05, clock=clock)


def request(worker: ConnectionBalancer, client: tuple[str, int]) -> bool:
    """A request and its answer on ``client``'s connection: whether the answer closes it."""
    worker.note(client)
    return worker.should_close(client)


def test_a_worker_holding_every_connection_closes_them_until_the_split_is_even(tmp_path: Path) -> None:
    clock = Clock()
    first, second = balancer(tmp_path, clock, 1), balancer(tmp_path, clock, 2)
    connections = {("10.0.0.1", port): first for port in range(1, 9)}  # all eight accepted by worker 1
    reconnects = 0
    for _ in range(200):  # each connection sends a request every 10 ms; a closed one reconnects to worker 2
        second.heartbeat()
        for client, worker in list(connections.items()):
            clock.now += 0.01 / len(connections)
            if request(worker, client):
                del connections[client]
                connections[("10.0.0.1", 1000 + reconnects)] = second
                reconnects += 1
    split = sorted(sum(w is worker for w in connections.values()) for worker in (first, second))
    assert split == [4, 4] and reconnects == 4  # closed exactly the excess, then left alone


def test_an_even_or_nearly_even_split_is_never_disturbed(tmp_path: Path) -> None:
    clock = Clock()
    first, second = balancer(tmp_path, clock, 1), balancer(tmp_path, clock, 2)
    clients = [(first, ("a", port)) for port in range(1, 6)] + [(second, ("b", port)) for port in range(1, 5)]
    for worker, client in clients:
        worker.note(client)  # both already serving
    closes = 0
    for _ in range(300):
        for worker, client in clients:
            clock.now += 0.002
            closes += request(worker, client)
    assert closes == 0 and first.closes == second.closes == 0


def test_a_silent_sibling_is_left_out_and_closes_are_paced(tmp_path: Path) -> None:
    clock = Clock()
    first, second = balancer(tmp_path, clock, 1), balancer(tmp_path, clock, 2)
    assert not any([request(first, ("c", port)) for port in range(1, 7)])  # no live sibling: nowhere to go
    second.heartbeat()  # worker 2 is up, with no connection
    decisions = [request(first, ("c", port)) for port in range(1, 7)]
    assert decisions == [True, False, False, False, False, False]  # one close per pace interval
    clock.now += 0.06
    assert request(first, ("c", 2))
    assert first.board.count(1, clock.now, 1.0) == 4  # what it published: six, less the two it let go
    clock.now += 1.5  # worker 2 paused (or gone) since: its heartbeat is too old
    assert not any([request(first, ("c", port)) for port in range(3, 7)])


def test_a_reloads_new_worker_ids_see_each_other(tmp_path: Path) -> None:
    clock = Clock()
    third, fourth = balancer(tmp_path, clock, 3), balancer(tmp_path, clock, 4)  # circus ids 3 and 4 of 2
    fourth.heartbeat()
    assert [request(third, ("c", port)) for port in range(1, 3)] == [False, True]
    with pytest.raises(ValueError):
        balancer(tmp_path, clock, 5)


def test_a_large_pool_is_left_alone_within_an_eighth(tmp_path: Path) -> None:
    clock = Clock()
    first, second = balancer(tmp_path, clock, 1), balancer(tmp_path, clock, 2)
    for held, other, closes in ((40, 36, False), (40, 34, True), (16, 14, True), (3, 1, True), (3, 2, False)):
        first._seen.clear()
        second.board.publish(2, other, clock.now)
        clock.now += 0.1  # past the pace of the last close
        decisions = [request(first, ("c", port)) for port in range(1, held + 1)]
        assert any(decisions) is closes, (held, other)


def test_connections_quiet_for_a_window_are_not_counted(tmp_path: Path) -> None:
    clock = Clock()
    first, _ = balancer(tmp_path, clock, 1), balancer(tmp_path, clock, 2)
    for port in range(1, 7):
        first.board.publish(2, 5, clock.now)
        assert not request(first, ("old", port))
    clock.now += 2.0
    first.board.publish(2, 1, clock.now)
    assert not request(first, ("new", 1))  # the six old ones left the window: 1 against 1
    assert first.board.count(1, clock.now, 1.0) == 1


def test_a_heartbeat_from_the_future_is_not_live(tmp_path: Path) -> None:
    board = LoadBoard(tmp_path / "boards" / "1.load")
    board.publish(2, 3, 5000.0)  # a board left from before a reboot: the monotonic clock started over
    assert board.count(2, 10.0, 1.0) is None and board.count(2, 5000.5, 1.0) == 3
    assert board.count(3, 5000.5, 1.0) is None  # never written


def _publish(path: str, worker: int, count: int) -> None:
    LoadBoard(Path(path)).publish(worker, count, time.monotonic())


def test_the_board_is_shared_between_processes(tmp_path: Path) -> None:
    path = tmp_path / "boards" / "9.load"
    board = LoadBoard(path)
    process = multiprocessing.get_context("spawn").Process(target=_publish, args=(str(path), 2, 7))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert board.count(2, time.monotonic(), 30.0) == 7 and board.count(1, time.monotonic(), 30.0) is None


def test_boards_of_gone_servers_are_removed_and_a_shared_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "boards"
    folder.mkdir(mode=0o700)
    dead = multiprocessing.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join(60)
    (folder / f"{dead.pid}.load").write_bytes(b"")
    (folder / f"{os.getpid()}.load").write_bytes(b"")  # a live server's board stays
    found = worker_balancer(1, 2, folder)
    assert found is not None and found.board.path == folder / f"{os.getppid()}.load"
    assert not (folder / f"{dead.pid}.load").exists() and (folder / f"{os.getpid()}.load").exists()
    assert worker_balancer(1, 1, folder) is None and worker_balancer(0, 2, folder) is None
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert worker_balancer(1, 2, shared) is None  # others could write there: no board, said in the log


def test_only_keep_alive_http_11_requests_count() -> None:
    def scope(version: str = "1.1", client: tuple[str, int] = ("c", 5), headers: list | None = None) -> dict:
        return {"http_version": version, "client": client, "headers": headers or []}

    assert keep_alive_client(scope()) == ("c", 5)
    assert keep_alive_client(scope("1.0")) is None
    assert keep_alive_client(scope(headers=[(b"Connection", b"close")])) is None
    assert keep_alive_client(scope(client=("203.0.113.9", 0))) is None  # rewritten by a proxy header


def test_the_middleware_closes_a_chosen_successful_answer_and_answers_it_in_full(tmp_path: Path) -> None:
    clock = Clock()
    first, second = balancer(tmp_path, clock, 1), balancer(tmp_path, clock, 2)
    second.heartbeat()
    statuses = iter([200, 200, 401, 200, 200])

    async def app(scope, receive, send) -> None:
        headers = [(b"connection", b"keep-alive")]
        await send({"type": "http.response.start", "status": next(statuses), "headers": headers})
        await send({"type": "http.response.body", "body": b"answer"})

    async def call(port: int, method: str = "POST") -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": method,
            "client": ("c", port),
            "headers": [],
        }
        await BalancedConnections(app, first)(scope, receive, send)
        return sent

    async def scenario() -> list[list[dict]]:
        answers = [await call(1), await call(2), await call(3)]  # the 401 is not closed, though one too many
        clock.now += 0.1
        return [*answers, await call(4), await call(9, "GET")]

    answers = asyncio.run(scenario())
    headers = [dict(sent[0]["headers"]) for sent in answers]
    assert [h[b"connection"] for h in headers] == [
        b"keep-alive",
        b"close",
        b"keep-alive",
        b"close",
        b"keep-alive",
    ]
    assert all(sent[1]["body"] == b"answer" for sent in answers)  # closing never withholds an answer
    assert headers[1] == {b"connection": b"close"}  # the app's own connection header replaced
    assert first.closes == 2  # the GET was not counted
