"""A user-defined reward module, loaded by import path in test_rewards.py."""


def length_penalty(problem, completion):
    return -len(completion) / 100


def broken(problem, completion):
    if "boom" in completion:
        raise RuntimeError("boom")
    return 1.0
