"""``parley chat``: a terminal client on the SDK, to try a running Parley by hand.

Lines you type are sent to the current conversation. Commands: ``/open <queue>``,
``/accept [conv]``, ``/decline [conv]``, ``/use <conv>``, ``/close``, ``/status online|away``,
``/transfer <queue>``, ``/quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from parley.client import ParleyClient, ParleyClientError


def describe(frame: dict[str, Any]) -> str:
    kind = frame.get("t")
    if kind == "ev":
        d = frame.get("data", {})
        if frame["type"] == "message":
            return f"[{frame['conv']} #{frame['seq']}] {d['from']['role']} {d['from']['id']}: {d['body']}"
        return f"[{frame['conv']} #{frame['seq']}] {frame['type']} {d}"
    return f"<{kind}> " + " ".join(f"{k}={v}" for k, v in frame.items() if k != "t")


async def chat(url: str, token: str) -> int:
    client = ParleyClient(url, token, keep_frames=False)
    state: dict[str, Any] = {"conv": None, "offer": None}

    def show(frame: dict[str, Any]) -> None:
        if frame.get("t") in ("pong", "ack"):
            return
        if frame.get("t") == "offer":
            state["offer"] = frame["conv"]
        if frame.get("t") == "ev" and state["conv"] is None:
            state["conv"] = frame["conv"]
        if frame.get("t") == "ev" and frame["type"] == "assigned":
            state["conv"] = frame["conv"]
        print(describe(frame), flush=True)

    client.on("*", show)
    try:
        welcome = await client.connect()
    except (ParleyClientError, TimeoutError, OSError) as exc:
        print(f"parley chat: cannot connect: {exc}", file=sys.stderr)
        return 1
    if welcome["convs"]:
        state["conv"] = welcome["convs"][0]["conv"]
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        word, _, rest = line.partition(" ")
        try:
            if word == "/quit":
                break
            elif word == "/open":
                state["conv"] = await client.open(rest or "support")
                print(f"opened {state['conv']}")
            elif word in ("/accept", "/decline"):
                conv = rest or state["offer"]
                await (client.accept(conv) if word == "/accept" else client.decline(conv))
            elif word == "/use":
                state["conv"] = rest
            elif word == "/close":
                await client.close_conversation(state["conv"])
            elif word == "/status":
                await client.set_status(rest)
            elif word == "/transfer":
                await client.transfer(state["conv"], rest)
            elif state["conv"] is None:
                print("no conversation yet: /open <queue> (customers) or wait for an offer (agents)")
            else:
                ack = await client.send(state["conv"], line)
                print(f"  stored as #{ack['seq']}")
        except (ParleyClientError, ConnectionError, TimeoutError) as exc:
            print(f"! {exc}")
    await client.close()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="parley chat")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/v1/ws")
    parser.add_argument("--token", required=True)
    args = parser.parse_args(argv)
    return asyncio.run(chat(args.url, args.token))
