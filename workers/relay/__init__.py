"""The RTP relay: media between the two legs of a call, commanded by the SIP workers."""
