"""Sans-IO protocol parsers and writers: fed bytes, they return events."""
