"""The users file (runtime/users.py) and the token format (runtime/tokens.py): read, check,
write atomically with mode 0600, add, rotate, remove, and what a reload revokes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support import private_file, write_file

import jobsched
from jobsched.runtime import users as users_module
from jobsched.runtime.tokens import looks_like_token, new_token, token_user, valid_user_name
from jobsched.runtime.users import (
    User,
    UsersFileError,
    add_user,
    read_users,
    remove_user,
    revoked,
    write_users,
)


def users_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    return private_file(tmp_path / "users.toml", text, mode)


def test_tokens_name_their_user_and_are_random():
    token = new_token("ann.lee")
    assert token_user(token) == "ann.lee"
    assert token.startswith("ann.lee:") and len(token.split(":", 1)[1]) >= 40
    assert new_token("ann.lee") != token
    assert looks_like_token(token) and looks_like_token(token.encode() + b"\n")
    for not_a_token in ["hunter2", "lab:short", "a b:" + "x" * 43, "x" * 300, ":" + "x" * 43]:
        assert token_user(not_a_token) is None and not looks_like_token(not_a_token)
    assert not looks_like_token(b"\xff\xfe:" + b"x" * 43)


@pytest.mark.parametrize("name", ["", "a b", "ann:lee", "zoë", "x" * 65, "a/b", 'a"b'])
def test_bad_user_names_are_refused(tmp_path, name):
    assert not valid_user_name(name)
    with pytest.raises(UsersFileError, match="user name"):
        add_user(str(tmp_path / "users.toml"), name)


def test_add_creates_the_file_mode_0600_whatever_the_umask(tmp_path):
    path = str(tmp_path / "users.toml")
    old = os.umask(0)
    try:
        token = add_user(path, "ann")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_users(path) == {"ann": User(token, 1.0, 0)}
    assert token_user(token) == "ann"


def test_the_file_is_private_from_the_first_byte(tmp_path, monkeypatch):
    """The temporary file is created 0600 and renamed over the old one: at no moment is a
    token readable by others, and a failed write leaves the old file and no temporary."""
    path = str(tmp_path / "users.toml")
    add_user(path, "ann")
    before = Path(path).read_text()
    modes = []
    real_replace = os.replace

    def replace(src, dst):
        modes.append(stat.S_IMODE(os.stat(src).st_mode))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(users_module.os, "replace", replace)
    with pytest.raises(UsersFileError, match="No space left"):
        add_user(path, "bob")
    monkeypatch.setattr(users_module.os, "replace", real_replace)
    assert modes == [0o600]
    assert Path(path).read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["users.toml"]


def test_rotating_a_token_keeps_weight_and_max_slots(tmp_path):
    path = str(tmp_path / "users.toml")
    first = add_user(path, "ann", weight=2.5, max_slots=4)
    second = add_user(path, "ann")
    assert second != first
    assert read_users(path)["ann"] == User(second, 2.5, 4)
    third = add_user(path, "ann", max_slots=0)
    assert read_users(path)["ann"] == User(third, 2.5, 0)


def test_remove_and_unknown_user(tmp_path):
    path = str(tmp_path / "users.toml")
    add_user(path, "ann")
    add_user(path, "bob")
    remove_user(path, "ann")
    assert set(read_users(path)) == {"bob"}
    with pytest.raises(UsersFileError, match="no user 'ann'.*bob"):
        remove_user(path, "ann")


def test_the_written_file_is_plain_toml_an_admin_can_edit(tmp_path):
    path = str(tmp_path / "users.toml")
    write_users(path, {"a.b": User(new_token("a.b"), 0.5, 3), "c": User(new_token("c"))})
    text = Path(path).read_text()
    assert '[users."a.b"]' in text and "max-slots = 3" in text and "weight = 0.5" in text
    edited = text.replace("max-slots = 3", "max-slots = 5")
    Path(path).write_text(edited)
    assert read_users(path)["a.b"].max_slots == 5


def test_defaults_when_only_the_token_is_given(tmp_path):
    token = new_token("ann")
    path = users_file(tmp_path, f'[users.ann]\ntoken = "{token}"\n')
    assert read_users(path) == {"ann": User(token, 1.0, 0)}


def test_an_empty_file_has_no_users(tmp_path):
    assert read_users(users_file(tmp_path, "")) == {}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_file_group_or_others_can_read_is_refused(tmp_path, mode):
    path = users_file(tmp_path, "", mode)
    with pytest.raises(UsersFileError, match=f"chmod 600 {path}") as info:
        read_users(path)
    assert f"{mode:o}" in str(info.value)
    with pytest.raises(UsersFileError, match="chmod 600"):
        add_user(path, "ann")  # never adds a token to a file others can read


def test_a_missing_file_says_how_to_create_one(tmp_path):
    with pytest.raises(UsersFileError, match="--add-user"):
        read_users(str(tmp_path / "nope.toml"))


TOKEN = new_token("ann")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[users.ann\n", "not valid TOML"),
        ('secret = "x"\n', "unknown key.*secret"),
        ('users = "ann"\n', "must be a table"),
        ("[users]\nann = 1\n", r"\[users.ann\] must be a table"),
        ('[users."a b"]\ntoken = "x"\n', "user name"),
        ("[users.ann]\nweight = 1\n", "token must be a string"),
        ('[users.ann]\ntoken = "ann"\n', "token must be a string"),
        (f'[users.bob]\ntoken = "{TOKEN}"\n', "names user 'ann', not 'bob'"),
        (f'[users.ann]\ntoken = "{TOKEN}"\nweight = 0\n', "weight must be a positive number"),
        (f'[users.ann]\ntoken = "{TOKEN}"\nweight = -1.5\n', "weight must be a positive number"),
        (f'[users.ann]\ntoken = "{TOKEN}"\nweight = "2"\n', "weight must be a positive number"),
        (f'[users.ann]\ntoken = "{TOKEN}"\nweight = inf\n', "weight must be a positive number"),
        (f'[users.ann]\ntoken = "{TOKEN}"\nmax-slots = -1\n', "max-slots must be a whole number"),
        (f'[users.ann]\ntoken = "{TOKEN}"\nmax-slots = 1.5\n', "max-slots must be a whole number"),
        (f'[users.ann]\ntoken = "{TOKEN}"\nmax-slots = true\n', "max-slots must be a whole number"),
        (f'[users.ann]\ntoken = "{TOKEN}"\nmax_slots = 2\n', "unknown key.*max_slots"),
    ],
)
def test_bad_contents_are_refused_naming_the_problem(tmp_path, text, expected):
    path = users_file(tmp_path, text)
    with pytest.raises(UsersFileError, match=expected) as info:
        read_users(path)
    assert path in str(info.value)


def test_errors_are_public_and_value_errors():
    assert issubclass(UsersFileError, jobsched.SecretError)
    assert jobsched.UsersFileError is UsersFileError
    assert issubclass(UsersFileError, ValueError)


def test_revoked_users_are_the_removed_and_the_rotated():
    ann, bob, cy = User(new_token("ann")), User(new_token("bob")), User(new_token("cy"))
    before = {"ann": ann, "bob": bob, "cy": cy}
    after = {"ann": User(ann.token, 3.0, 2), "bob": User(new_token("bob")), "dee": User(new_token("dee"))}
    assert revoked(before, after) == frozenset({"bob", "cy"})  # ann's weight changed, not her token
    assert revoked(before, before) == frozenset()


def test_add_refuses_a_folder_that_does_not_exist(tmp_path):
    with pytest.raises(UsersFileError, match="cannot write"):
        add_user(str(tmp_path / "no" / "users.toml"), "ann")


def test_a_hand_written_file_with_other_tables_is_refused(tmp_path):
    path = write_file(tmp_path / "users.toml", f'[users.ann]\ntoken = "{TOKEN}"\n[groups.lab]\nmembers = ["ann"]\n')
    os.chmod(path, 0o600)
    with pytest.raises(UsersFileError, match="unknown key.*groups"):
        read_users(path)
