"""`mass env`: print the export lines that let stock nnU-Net commands find our trainers."""
import typer


def env() -> None:
    """Print shell `export` lines for nnUNet_extTrainer and the nnU-Net folders (for plain nnUNetv2_* use)."""
    from mass_nnu.workspace import export_lines

    typer.echo(export_lines())
