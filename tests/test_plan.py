import json


def test_transferred_plans_build_the_target_network(experiment_env):
    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.networks import build_network

    plans_id = experiment_env["plans"]
    target = Dataset.resolve(712).plans(plans_id)
    moved = Dataset.resolve(711).plans(plans_id)
    assert moved["dataset_name"] == "Dataset711_PhantomPre"
    assert moved["mass_transfer"]["architecture_from"] == "Dataset712_PhantomSeg"
    config = "3d_fullres"
    assert moved["configurations"][config]["patch_size"] == target["configurations"][config]["patch_size"]
    a = build_network(target, config, 1, 7).state_dict()
    b = build_network(moved, config, 1, 7).state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    # nnU-Net issue 2560: the transferred dataset has its own dataset.json beside the plans, and is preprocessed
    meta = json.loads((Dataset.resolve(711).preprocessed / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "foreground": 1}
    data_folder = Dataset.resolve(711).preprocessed / moved["configurations"][config]["data_identifier"]
    assert len(list(data_folder.glob("*.b2nd"))) >= 4


def test_transfer_keeps_own_normalisation(experiment_env, nnunet_env):
    """An MRI cohort planned with a CT target keeps z-score normalisation and its own intensity statistics."""
    from mass_nnu.demo_data.phantom import write_phantom_dataset
    from mass_nnu.planning.transfer import transfer_plans

    ct_plans = json.loads(json.dumps(_ct_plans(experiment_env)))
    folder = write_phantom_dataset(801, "FakeMR", 2, 0, labelled=False)
    meta = json.loads((folder / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    path = transfer_plans(ct_plans, 801, "nnUNetResEncUNetMPlans", num_processes=1)
    moved = json.loads(path.read_text())
    assert ct_plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    assert moved["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    assert moved["foreground_intensity_properties_per_channel"] != ct_plans["foreground_intensity_properties_per_channel"]


def _ct_plans(env):
    from pathlib import Path

    return json.loads((Path(env["env"]["nnUNet_preprocessed"]) / "Dataset712_PhantomSeg" /
                       f"{env['plans']}.json").read_text())


def test_plan_cli_unknown_dataset(nnunet_env, run_cli):
    result = run_cli("plan", "-d", "999")
    assert result.exit_code == 1
    assert "unknown dataset '999'" in result.stderr and "Traceback" not in result.output


def test_plan_cli_several_pretraining_datasets(nnunet_env, run_cli):
    """Two pretraining datasets (one without labelsTr) take the target's plans; the table shows all three."""
    import shutil

    from mass_nnu.adapter.datasets import Dataset
    from mass_nnu.adapter.networks import build_network
    from mass_nnu.demo_data.phantom import write_phantom_dataset

    write_phantom_dataset(805, "PlanMe", 3, 0, shape=(24, 32, 32))
    for dataset_id, name in ((806, "PreA"), (807, "PreB")):
        folder = write_phantom_dataset(dataset_id, name, 2, 0, shape=(24, 28, 32), seed=dataset_id, labelled=False)
    shutil.rmtree(folder / "labelsTr")
    result = run_cli("plan", "-d", "806", "-d", "807", "--target-dataset", "805", "-np", "1", "--no-pp")
    assert result.exit_code == 0, result.output
    assert "wrote Otsu foreground masks" in result.stdout and len(list((folder / "labelsTr").iterdir())) == 2
    # quiet by default: nnU-Net's plans dicts go to the log file, not the screen
    log = Dataset.resolve(805).preprocessed / "mass_plan_log.txt"
    assert "3D fullres U-Net configuration" not in result.output and "3D fullres U-Net configuration" in log.read_text()
    table = result.stdout[result.stdout.index("dataset | spacing"):].splitlines()
    assert [row.split(" | ")[0] for row in table[1:4]] == ["Dataset805_PlanMe", "Dataset806_PreA", "Dataset807_PreB"]
    assert all("ResidualEncoderUNet" in row and "CTNormalization" in row for row in table[1:4])
    target = build_network(Dataset.resolve(805).plans("nnUNetResEncUNetMPlans"), "3d_fullres", 1, 2).state_dict()
    for dataset_id in (806, 807):
        moved = build_network(Dataset.resolve(dataset_id).plans("nnUNetResEncUNetMPlans"), "3d_fullres", 1, 2).state_dict()
        assert {k: v.shape for k, v in moved.items()} == {k: v.shape for k, v in target.items()}
