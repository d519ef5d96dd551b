"""The local-rules study's schema and figure (studies/catalogue/local_rules.py): its fields are
ep_train's (shared, not copied), and the time-constant-mismatch axis names the relaxation the runs
used, not a fixed one."""

import numpy as np
import xarray as xr

from studies.catalogue import devices, ep, local_rules


def test_the_schema_shares_ep_trains_fields():
    schema, shared = local_rules.LOCAL_RULES_SCHEMA, ep.EP_TRAIN_SCHEMA
    assert list(schema) == [k for k in shared if not k.startswith("homeostasis")]
    for k in ("data", "n_train", "n_test", "network", "relaxation", "momentum", "epochs", "batch_size", "probe"):
        assert schema[k] is shared[k], k
    assert schema["rule"]["beta"] is ep.EP_RULE["beta"] and schema["rule"]["points"] is ep.EP_RULE["points"]
    assert (schema["optimiser"].default, schema["lr"].default) == ("adam", 0.003)
    assert schema["optimiser"].allowed == shared["optimiser"].allowed and schema["lr"].allowed == shared["lr"].allowed


def test_the_tau_mismatch_label_names_the_swept_relaxation_time():
    runs = xr.Dataset(coords={"relaxation_time": ("setting", np.array([0.0, 8.0, 8.0, 0.0]))})
    assert devices.level_label(runs, "tau_mismatch", [1, 2]).endswith(r"(relaxation time 8 $\tau$)")
    assert devices.level_label(runs, "tau_mismatch", [0, 3]).endswith("(phases relaxed to tolerance)")
    assert devices.level_label(runs, "read_noise", [1]) == devices.LEVEL_LABELS["read_noise"]
    # the local-rules study sets no relaxation time: no claim about one
    assert devices.level_label(xr.Dataset(), "tau_mismatch", [0]) == r"relative s.d. of $\tau$"
