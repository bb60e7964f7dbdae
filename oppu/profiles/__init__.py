"""Textual user profiles for profile-augmented personalization (PAG): writers and storage."""

from oppu.profiles.storage import (
    ensure_profiles,
    profiles_uri,
    read_profiles,
    run_profiles,
    stored_profiles,
    write_profiles,
    writer_for_run,
)
from oppu.profiles.writers import (
    STATISTICAL_MARK,
    WRITER_NAMES,
    HFProfileWriter,
    OpenAIProfileWriter,
    ProfileWriter,
    StatisticalProfileWriter,
    make_writer,
)

__all__ = [
    "STATISTICAL_MARK", "WRITER_NAMES", "HFProfileWriter", "OpenAIProfileWriter", "ProfileWriter",
    "StatisticalProfileWriter", "ensure_profiles", "make_writer", "profiles_uri", "read_profiles",
    "run_profiles", "stored_profiles", "write_profiles", "writer_for_run",
]
