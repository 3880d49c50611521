"""v0 hooks: the agent calls these at named points (see agent.py, "Scaffold hooks")."""


def extra_context(phase, ctx):
    """Tell the model when its last action changed nothing it can see: a stuck agent repeats."""
    if phase == "log" and ctx["previous_observation"] == ctx["observation"]:
        return ("\nNotice: the observation is exactly the same as before your last action; it "
                "may have had no effect.\n")
    return ""
