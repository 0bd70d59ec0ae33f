"""Raw logs of any system in: line formats, sources and presets, masking, template ids,
sessions, the parsing benchmark and the ``feddale logs`` commands (issue 13)."""
