"""Stored Responses API objects on SQLite and on a real PostgreSQL server (tests/test_store.py's throwaway
server): round trips of client JSON, deletion as if never stored, cursor pagination both ways, the input items
listing, previous_response_id chains, and a store reopened on the same database."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ember.store import Store, StoreConfig, responses
from tests.test_store import clean_store_config, postgres  # noqa: F401  (postgres: a fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_config(request, tmp_path) -> StoreConfig:
    return clean_store_config(request, tmp_path, [responses.response_input_items, responses.responses])


@pytest.fixture
def store(store_config) -> Iterator[Store]:
    store = Store(store_config)
    yield store
    store.close()


def _response(i: int, created_at: float = 1000.0, **kw: Any) -> dict[str, Any]:
    return {"id": f"resp_{i:02d}", "object": "response", "created_at": created_at, "model": "m", "status": "completed",
            "output": [{"id": f"msg_out{i}", "type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": f"answer {i}", "annotations": []}]}], **kw}


def _item(name: str) -> dict[str, Any]:
    return {"id": f"msg_{name}", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": f"question {name}"}]}


def _ids(page: tuple[list[dict[str, Any]], bool]) -> tuple[list[str], bool]:
    return [r["id"] for r in page[0]], page[1]


def test_round_trip_of_nested_json(store):
    response = _response(1, created_at=1717171717.125, usage={"input_tokens": 3, "details": None},
                         metadata={"ключ": "значение 🙂", "flag": True, "nested": [[1, 2.5], {"a": []}]},
                         instructions="lone \ud800 surrogate")
    items = [_item("a"), {**_item("b"), "content": [{"type": "input_text", "text": "x\udfffy 日本"}]}]
    store.put_response(response, items, None)
    assert store.get_response("resp_01") == {**response, "instructions": "lone \\ud800 surrogate"}
    assert store.list_input_items("resp_01", order="asc")[0] == [
        items[0], {**items[1], "content": [{"type": "input_text", "text": "x\\udfffy 日本"}]}]
    assert store.get_response("resp_99") is None and store.get_response("bad \ud800 id") is None
    store.put_response({**response, "status": "cancelled"}, [_item("c")], None)  # stored again: replaced
    assert store.get_response("resp_01")["status"] == "cancelled"
    assert _ids(store.list_input_items("resp_01")) == (["msg_c"], False)
    assert _ids(store.list_responses()) == (["resp_01"], False)


def test_deleted_is_unknown_everywhere(store):
    store.put_response(_response(1, 1.0), [_item("a")], None)
    store.put_response(_response(2, 2.0), [_item("b")], "resp_01")
    store.put_response(_response(3, 3.0), [], None)
    assert store.delete_response("resp_02") is True
    assert store.get_response("resp_02") is None
    assert _ids(store.list_responses()) == (["resp_03", "resp_01"], False)
    assert store.list_input_items("resp_02") is None and store.conversation("resp_02") is None
    with pytest.raises(ValueError, match="resp_02"):
        store.list_responses(after="resp_02")
    assert store.delete_response("resp_02") is False and store.delete_response("resp_99") is False


def test_list_pages_both_ways(store):
    times = [10.0, 20.0, 20.0, 30.0, 40.0]  # a tie in created_at: the id breaks it
    for i, t in enumerate(times, 1):
        store.put_response(_response(i, t), [], None)
    assert _ids(store.list_responses()) == (["resp_05", "resp_04", "resp_03", "resp_02", "resp_01"], False)
    assert _ids(store.list_responses(limit=2)) == (["resp_05", "resp_04"], True)
    assert _ids(store.list_responses(limit=2, after="resp_04")) == (["resp_03", "resp_02"], True)
    assert _ids(store.list_responses(limit=2, after="resp_02")) == (["resp_01"], False)
    assert _ids(store.list_responses(limit=2, before="resp_02")) == (["resp_04", "resp_03"], True)
    assert _ids(store.list_responses(limit=2, before="resp_04")) == (["resp_05"], False)
    assert _ids(store.list_responses(after="resp_05", before="resp_02")) == (["resp_04", "resp_03"], False)
    assert _ids(store.list_responses(order="asc", limit=3)) == (["resp_01", "resp_02", "resp_03"], True)
    assert _ids(store.list_responses(order="asc", limit=3, after="resp_03")) == (["resp_04", "resp_05"], False)
    assert _ids(store.list_responses(order="asc", limit=1, before="resp_03")) == (["resp_02"], True)
    assert _ids(store.list_responses(order="asc", before="resp_01")) == ([], False)
    with pytest.raises(ValueError, match="resp_77"):
        store.list_responses(before="resp_77")
    with pytest.raises(ValueError, match="order"):
        store.list_responses(order="newest")


def test_input_items_listing(store):
    store.put_response(_response(1), [_item(c) for c in "abcde"], None)
    store.put_response(_response(2), [_item("z")], None)
    assert _ids(store.list_input_items("resp_01")) == (["msg_e", "msg_d", "msg_c", "msg_b", "msg_a"], False)
    assert _ids(store.list_input_items("resp_01", limit=2, after="msg_d")) == (["msg_c", "msg_b"], True)
    assert _ids(store.list_input_items("resp_01", limit=2, before="msg_b")) == (["msg_d", "msg_c"], True)
    assert _ids(store.list_input_items("resp_01", order="asc", after="msg_c")) == (["msg_d", "msg_e"], False)
    with pytest.raises(ValueError, match="msg_z"):  # another response's item is no cursor here
        store.list_input_items("resp_01", after="msg_z")
    assert store.list_input_items("resp_99") is None


def test_conversation_walks_the_chain(store, monkeypatch):
    store.put_response(_response(1, 1.0), [_item("a1"), _item("a2")], None)
    store.put_response(_response(2, 2.0), [_item("b")], "resp_01")
    store.put_response(_response(3, 3.0), [_item("c")], "resp_02")
    store.put_response(_response(4, 4.0), [_item("d")], "resp_02")  # a branch beside resp_03
    assert [i["id"] for i in store.conversation("resp_03")] == [
        "msg_a1", "msg_a2", "msg_out1", "msg_b", "msg_out2", "msg_c", "msg_out3"]
    assert [i["id"] for i in store.conversation("resp_04")][-2:] == ["msg_d", "msg_out4"]
    assert store.conversation("resp_99") is None
    monkeypatch.setattr(responses, "MAX_CHAIN", 2)
    with pytest.raises(ValueError, match="more than 2"):
        store.conversation("resp_03")
    monkeypatch.undo()
    store.put_response(_response(1, 1.0), [], "resp_03")  # rewritten into a cycle
    with pytest.raises(ValueError, match="cycle"):
        store.conversation("resp_03")
    store.put_response(_response(1, 1.0), [], None)
    assert store.delete_response("resp_02")
    assert store.conversation("resp_03") is None and store.conversation("resp_04") is None
    assert [i["id"] for i in store.conversation("resp_01")] == ["msg_out1"]


def test_data_survives_a_restart(store_config):
    first = Store(store_config)
    first.put_response(_response(1, 1.0), [_item("a")], None)
    first.put_response(_response(2, 2.0), [_item("b")], "resp_01")
    first.close()
    again = Store(store_config)
    assert again.get_response("resp_02") == _response(2, 2.0)
    assert _ids(again.list_responses()) == (["resp_02", "resp_01"], False)
    assert [i["id"] for i in again.conversation("resp_02")] == ["msg_a", "msg_out1", "msg_b", "msg_out2"]
    again.close()
