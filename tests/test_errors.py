"""One root for the errors a user can cause: what the CLI and the window catch to show a message."""
from app import errors
from labelers import base as lb
from labelers.errors import UserError


def test_every_user_error_shares_one_root():
    for cls in (errors.NeuronStudioError, errors.ModelLoadError, errors.DatasetError, errors.ProjectError,
                errors.JobError, lb.LabelerError, lb.MissingInputError):
        assert issubclass(cls, UserError), cls
    assert not issubclass(lb.Cancelled, UserError)  # a cancel is not an error


def test_the_window_shows_the_message_of_either_kind():
    from app.ui.jobproc import readable_error

    assert readable_error(lb.LabelerError("beam_size must be a number")) == "beam_size must be a number"
    assert readable_error(errors.JobError("no layer", fix="pick one")) == "no layer. pick one."
    assert readable_error(ValueError("x")).startswith("unexpected ValueError: x")
