"""Reading lead files: formats, encodings, header aliases, phone normalisation.

The importer (importer.py) streams LeadFile.rows() into the store and owns dedupe.
"""

from wecomctl.ingest.model import Blank, Lead, Reject
from wecomctl.ingest.phones import PhoneRejected, normalise_mobile
from wecomctl.ingest.readers import LeadFile, ReadOptions, open_lead_file

__all__ = ["Blank", "Lead", "LeadFile", "PhoneRejected", "ReadOptions", "Reject", "normalise_mobile",
           "open_lead_file"]
