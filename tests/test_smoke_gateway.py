from helpers import token

from parley.client import ParleyClient


async def test_customer_open_send_ack_and_event(gateway, tenant):
    c = ParleyClient(gateway.ws_url, token("cust1", tenant))
    welcome = await c.connect()
    assert welcome["role"] == "customer" and welcome["convs"] == []
    conv = await c.open("support")
    ack = await c.send(conv, "hello")
    assert ack["seq"] > 0
    ev = await c.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "message")
    assert ev["data"]["body"] == "hello" and ev["seq"] == ack["seq"]
    assert c.violations == []
    await c.close()
