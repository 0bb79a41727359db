"""The thread policy (fae_pipe.threads): wait policy inherited by every fae-pipe process, auto thread count."""

import os
import subprocess
import sys

import torch

from fae_pipe import threads


def test_wait_policy_default_and_user_value_kept():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import fae_pipe, os; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_auto_threads_rules(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.auto_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on this machine share its cores
    assert threads.auto_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.auto_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's or launcher's choice wins over the division
    assert threads.auto_threads() == 3


def test_configure_threads_explicit_wins(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.configure_threads(2) == 2 and torch.get_num_threads() == 2
        assert threads.configure_threads(0) == 1 and torch.get_num_threads() == 1
        assert "OMP_WAIT_POLICY=" in threads.describe()
    finally:
        torch.set_num_threads(before)
