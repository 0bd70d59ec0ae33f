"""Template ids: Drain3 plus refinement, kept per source across restarts."""

import pytest

from feddale.ingest.templates import MinerSettings, TemplateStore, template_key


def _ids(store, messages):
    return [store.add(m).template_id for m in messages]


def test_a_few_words_in_one_place_name_different_events():
    store = TemplateStore()
    events = ["Started", "Resumed", "Paused", "Stopped"]
    ids = _ids(store, [f"[instance: <*>] VM {e} (Lifecycle Event)" for e in events * 3])
    assert len(set(ids)) == 4
    assert ids[:4] == ids[4:8] == ids[8:]
    assert store.add("[instance: <*>] VM Paused (Lifecycle Event)").template == (
        "[instance: <*>] VM Paused (Lifecycle Event)"
    )


def test_many_words_in_one_place_are_a_variable():
    store = TemplateStore()
    users = ["root", "admin", "test", "guest", "oracle", "webmaster", "ftp", "nagios"]
    messages = [f"Failed password for invalid user {u} from <*> port <*> ssh<*>" for u in users]
    matches = [store.add(m) for m in messages]
    # While streaming the first few users looked like event names; read again at the end,
    # every line has the one template.
    assert len({m.template_id for m in matches}) > 1
    assert len({store.resolve(m.cluster_id, text).template_id for m, text in zip(matches, messages)}) == 1
    assert store.add("Failed password for invalid user bob from <*> port <*> ssh<*>").template == (
        "Failed password for invalid user <*> from <*> port <*> ssh<*>"
    )


def test_a_shared_key_prefix_stays_in_the_template():
    store = TemplateStore()
    for user in ["root", "a", "b", "c", "d", "e"]:
        match = store.add(f"authentication failure; rhost=<*> user={user}")
    assert match.template == "authentication failure; rhost=<*> user=<*>"
    assert store.add("authentication failure; rhost=<*>").template_id != match.template_id


def test_optional_variables_do_not_split_an_event():
    store = TemplateStore()
    with_size = store.add("<*> close, <*> bytes (<*>) sent, <*> bytes received, lifetime <*>")
    without = store.add("<*> close, <*> bytes sent, <*> bytes received, lifetime <*>")
    assert with_size.template_id == without.template_id
    assert template_key("from <*> (<*>) at <*>") == template_key("from <*> () at <*>") == "from at"


def test_ids_survive_a_restart_and_new_templates_continue_the_numbering(tmp_path):
    first = TemplateStore(state_dir=tmp_path / "app")
    a = first.add("Receiving block blk_<*> src: /<*> dest: /<*>")
    b = first.add("Verification succeeded for blk_<*>")
    for user in ["a", "b", "c", "d", "e", "f"]:
        first.add(f"session opened for user {user}")
    first.save()
    assert {p.name for p in (tmp_path / "app").iterdir()} == {"drain3.state", "refinement.json"}

    second = TemplateStore(state_dir=tmp_path / "app")
    assert second.add("Verification succeeded for blk_<*>").template_id == b.template_id
    assert second.add("Receiving block blk_<*> src: /<*> dest: /<*>").template_id == a.template_id
    assert second.add("session opened for user zed").template == "session opened for user <*>"
    assert second.add("something entirely new").template_id == f"T{second.template_count}"
    assert second.template_count > first.template_count


def test_unreadable_or_mismatched_state_is_a_clear_error(tmp_path):
    store = TemplateStore(state_dir=tmp_path / "s")
    store.add("hello <*>")
    store.save()
    with pytest.raises(ValueError, match="mined with"):
        TemplateStore(MinerSettings(sim_th=0.9), state_dir=tmp_path / "s")
    (tmp_path / "s" / "refinement.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read template state"):
        TemplateStore(state_dir=tmp_path / "s")
    (tmp_path / "s" / "refinement.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        TemplateStore(state_dir=tmp_path / "s")


def test_without_a_state_folder_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = TemplateStore()
    store.add("x <*>")
    store.save()
    assert list(tmp_path.iterdir()) == []
