"""Operations: settings, logging, metrics, health, admin."""
