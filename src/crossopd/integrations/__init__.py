"""Engine integrations: crossopd's OPD step inside existing trainers (TRL; verl later)."""
