"""Pure tensor math used by lorakit: no ``nn.Module`` state lives here."""
