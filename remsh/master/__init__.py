"""The master side: slave objects, listeners that connect them, collections."""
